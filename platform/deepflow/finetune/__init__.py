"""Fine-tuning: chat examples tokenized for training (``data``), the training loop
(``train``), and the ``finetune`` job kind's operators (``operators``). The package ships a
small demo chat dataset under ``examples/``."""

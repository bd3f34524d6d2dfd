"""Fine-tuning fixtures: the random tiny model (fast) and the bundled demo chat dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "platform/deepflow/finetune/examples"
TRAIN_FILE = EXAMPLES / "deepflow_chat_train.jsonl"
VALID_FILE = EXAMPLES / "deepflow_chat_valid.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepflow.engine.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny") / "tiny", "llama", "tiny")

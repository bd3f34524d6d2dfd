"""The Batch API's work (``/v1/batches``): a file of OpenAI requests run as one ``batch`` job.

Where a batch runs: an **offline engine on a worker** (``deepflow.engine.llm.LLM`` in the
``batch.run_shard`` operator), not the serving instances' spare capacity. Why:

- isolation: a batch of thousands of requests never queues in front of, or takes KV cache
  from, the interactive requests the serving instances answer within their latency targets;
  it takes a worker of its resource class like any other task, and the scheduler of jobs
  decides when;
- no gateway or HTTP per request: the worker reads the file, tokenises and runs every line
  in-process, with no connection, SSE framing or JSON re-parsing per request;
- full batches: every line of a shard is admitted to the engine before its first step, so the
  continuous-batching scheduler runs at ``max_num_seqs`` until the shard's last requests,
  which is the offline engine's own throughput (``bench/batch.py`` compares the two).

Each line is checked and answered exactly as the engine daemon would (the daemon's
``Preparer``, ``ChatReply`` and ``CompletionReply``): a line the daemon would refuse (an unknown
model, a prompt too long for the context) goes to the error file with the daemon's error body,
while the others run.

The job's DAG (``dag.kinds._batch_tasks``): ``split_input`` -> ``run_shard_<i>`` ->
``merge_results``. Shards write their results as they go and resume from them when retried
(``results``); their counts are the batch's live ``request_counts`` (``store.batches``).
"""

from deepflow.batches.input_file import InputSummary, InvalidBatch, check_input
from deepflow.batches.status import ENDED, Status, batch_status

__all__ = ["ENDED", "InputSummary", "InvalidBatch", "Status", "batch_status", "check_input"]

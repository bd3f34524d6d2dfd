"""Job -> task-DAG decomposition, validation, trigger rules and the ready-set function."""

from deepflow.dag.errors import DagError
from deepflow.dag.graph import Dag, Node
from deepflow.dag.kinds import KINDS, Plan, plan, plan_user_job
from deepflow.dag.ready import Decision, evaluate
from deepflow.dag.spec import MAX_TASK_TIMEOUT_S, ResourceClass, TaskSpec
from deepflow.dag.states import TERMINAL_JOB_STATES, TERMINAL_TASK_STATES, JobState, TaskState
from deepflow.dag.trigger_rules import TriggerRule

__all__ = [
    "KINDS",
    "MAX_TASK_TIMEOUT_S",
    "TERMINAL_JOB_STATES",
    "TERMINAL_TASK_STATES",
    "Dag",
    "DagError",
    "Decision",
    "JobState",
    "Node",
    "Plan",
    "ResourceClass",
    "TaskSpec",
    "TaskState",
    "TriggerRule",
    "evaluate",
    "plan",
    "plan_user_job",
]

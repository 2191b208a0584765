"""Stage 1: task loading, templates, splits and the synthetic benchmark suite."""

from taskpgm_ray.tasks.loading import (
    Example,
    TaskData,
    TaskError,
    check_apart,
    evaluation_configs,
    load_evaluation,
    load_task,
    load_tasks,
    task_configs,
    write_manifest,
)

__all__ = ["Example", "TaskData", "TaskError", "check_apart", "evaluation_configs", "load_evaluation", "load_task",
           "load_tasks", "task_configs", "write_manifest"]

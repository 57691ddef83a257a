"""Model registry: ``get_model_spec(name)``, ``list_models()``, tasks and builders."""

from hawq.models.registry import MODELS, ModelSpec, get_model_spec, list_models, register_model
from hawq.models.tasks import TASKS, ClassificationTask, Task, get_task, register_task

__all__ = ["MODELS", "ModelSpec", "get_model_spec", "list_models", "register_model",
           "TASKS", "Task", "ClassificationTask", "get_task", "register_task"]

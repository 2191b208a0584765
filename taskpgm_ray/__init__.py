"""taskpgm_ray: TaskPGM task-mixture selection and mixture fine-tuning on Ray.

Kept import-light on purpose: ``import taskpgm_ray.mixture`` must need numpy alone.
"""

__version__ = "0.1.0"

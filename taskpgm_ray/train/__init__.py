"""Stage 6: fine-tune on a task mixture with Ray Train and DeepSpeed.

* ``sampler``          the mixture sampler (pure numpy): a global stream of draws, disjoint across ranks
* ``validation``       bad mixtures and train settings, caught before any worker starts
* ``deepspeed_config`` the DeepSpeed config and the LR schedule
* ``recipe``           the per-worker recipe: setup -> train -> cleanup
* ``launch``           the driver: ``build_trainer`` (reused by Tune), ``run_training``, ``train_command``
"""

from taskpgm_ray.train.launch import build_trainer, run_training, train_command
from taskpgm_ray.train.sampler import MixtureSampler, SamplerExhausted, draw_probabilities
from taskpgm_ray.train.validation import read_mixture_weights, validate_mixture

__all__ = [
    "MixtureSampler",
    "SamplerExhausted",
    "build_trainer",
    "draw_probabilities",
    "read_mixture_weights",
    "run_training",
    "train_command",
    "validate_mixture",
]

"""Where model, weights, data and loss come from: the spec strings of the CLI, resolved."""

from hessian_cli.engine.misfit import embedding_reach
from hessian_cli.specs.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_SUFFIXES,
    LoadedCheckpoint,
    apply_weights,
    checkpoint_order_key,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from hessian_cli.specs.data import (
    DataSource,
    analysis_batches,
    anchored_data,
    cast_inputs,
    check_finite,
    check_labels,
    check_root_options,
    load_data,
)
from hessian_cli.specs.fit import check_fits, model_device, takes_token_ids
from hessian_cli.specs.losses import (
    BUILTIN_LOSSES,
    check_next_tokens,
    check_targets,
    default_loss,
    get_loss,
)
from hessian_cli.specs.models import BUILTIN_MODELS, build_model
from hessian_cli.specs.user_code import absolute, anchored, load_object

__all__ = [
    "BUILTIN_LOSSES",
    "BUILTIN_MODELS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SUFFIXES",
    "DataSource",
    "LoadedCheckpoint",
    "absolute",
    "analysis_batches",
    "anchored",
    "anchored_data",
    "apply_weights",
    "build_model",
    "cast_inputs",
    "check_finite",
    "check_fits",
    "embedding_reach",
    "check_labels",
    "check_root_options",
    "check_next_tokens",
    "check_targets",
    "checkpoint_order_key",
    "default_loss",
    "get_loss",
    "list_checkpoints",
    "load_checkpoint",
    "load_data",
    "load_object",
    "model_device",
    "save_checkpoint",
    "takes_token_ids",
]

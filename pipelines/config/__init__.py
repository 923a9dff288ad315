"""Every job's configuration, one dialect: frozen dataclasses that map one-to-one onto YAML.

:class:`TrainConfig` (``jobs/configs/train_*.yaml``), :class:`PredictConfig`,
:class:`ExportMasksConfig`, :class:`TunePostprocessConfig`, :class:`RankConfig`,
:class:`ExplainConfig`,
:class:`EvaluateConfig`,
:class:`ValidateConfig`, :class:`PackConfig`, :class:`DemoConfig`, and the Serve application's :class:`ServeArgs` / :class:`BatchSettings`.
:func:`load_config` builds any of them from a YAML file, a command's flags and ``--set``
overrides, through the one strict builder :func:`seg_core.config.from_dict`.

Every YAML key is a dataclass field of the same name; nested mappings are nested dataclasses
(``model`` -> :class:`seg_core.config.ModelConfig`, ``mask`` -> :class:`MaskSpec`,
``preprocessing`` -> :class:`Preprocessing`, plus the training-only groups below).  A job builds
its config once (YAML, then flags, then ``--set dotted.key=value`` overrides) and everything below
receives the typed object; it becomes a dict only where Ray or a JSON file needs one.

Names follow H2O where H2O has one (``epochs``, ``max_iterations``, ``max_runtime_secs``,
``nfolds``, ``fold_column``, ``fold_assignment``, ``stopping_rounds``, ``stopping_tolerance``,
``seed``).
"""
from pipelines.config.jobs import (
    PredictConfig,
    ExportMasksConfig,
    ExplainConfig,
    RankConfig,
    TunePostprocessConfig,
    EvaluateConfig,
    PromoteConfig,
    DriftThresholds,
    MonitorConfig,
    RunsConfig,
    ValidateConfig,
    PackConfig,
    BenchConfig,
    DemoConfig,
    ServeArgs,
    BatchSettings,
)
from pipelines.config.loader import (
    load_config,
    load_settings,
    apply_overrides,
    read_yaml,
    load_train_config,
    set_dotted,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from pipelines.config.train import (
    AmpMode,
    FoldAssignment,
    DataSpec,
    AugmentSpec,
    OptimSpec,
    PlacementStrategy,
    ScalingSpec,
    StorageSpec,
    TrainConfig,
)

__all__ = [
    "AmpMode",
    "AugmentSpec",
    "BatchSettings",
    "BenchConfig",
    "DataSpec",
    "DemoConfig",
    "DriftThresholds",
    "EvaluateConfig",
    "ExportMasksConfig",
    "ExplainConfig",
    "RankConfig",
    "TunePostprocessConfig",
    "FoldAssignment",
    "MonitorConfig",
    "OptimSpec",
    "PackConfig",
    "PlacementStrategy",
    "PredictConfig",
    "PromoteConfig",
    "RunsConfig",
    "ScalingSpec",
    "ServeArgs",
    "StorageSpec",
    "TrainConfig",
    "ValidateConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_settings",
    "load_train_config",
    "read_yaml",
    "set_dotted",
]

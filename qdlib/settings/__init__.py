"""Every config of qdlib, declared once and torch-free (:mod:`qdlib.schema` declares how).

==============================  ==========================  ==================================================
config                          command                     module
==============================  ==========================  ==================================================
:class:`DistillConfig`          ``qd distill``              :mod:`.distill` (YAML files with three sections)
:class:`FeatureTrainConfig`     ``qd train-fast``           :mod:`.training`
:class:`TeacherTrainConfig`     ``qd train-teacher``        :mod:`.training`
:class:`RetrievalConfig`        ``qd train-memory``         :mod:`.training`
:class:`BenchConfig`            ``qd bench``                :mod:`.bench`
==============================  ==========================  ==================================================

The ``qd`` command makes each command's options, ``--set`` and ``--list-keys`` from these declarations, so a
setting has one name, one check and one help text everywhere; :mod:`.names` holds the names settings may take.
"""

from .bench import KINDS, METHODS, BenchConfig, quick_config
from .distill import (DEFAULT_CONFIGS, SECTIONS, DistillConfig, DraftModelConfig, KnowledgeConfig, TrainingConfig,
                      config_keys, load_config)
from .training import FeatureTrainConfig, RetrievalConfig, TeacherTrainConfig

__all__ = ["BenchConfig", "DEFAULT_CONFIGS", "DistillConfig", "DraftModelConfig", "FeatureTrainConfig", "KINDS",
           "KnowledgeConfig", "METHODS", "RetrievalConfig", "SECTIONS", "TeacherTrainConfig", "TrainingConfig",
           "config_keys", "load_config", "quick_config"]

"""The names each setting may take, in one torch-free place (the ``qd`` command's help lists them at once).

Each enumeration belongs to the module that acts on it (the comment says which); it is declared here so that
the config schemas (:mod:`qdlib.settings`) and the command line read it without importing torch.
"""

SOURCES = ("stdlib", "torch", "transformers")  # qdlib.corpus: the teacher's corpus sources
STRATEGIES = ("uniform", "geometric", "logarithmic", "importance")  # qdlib.sampling
EARLY_EXIT = "first-k"  # the early-exit baseline (the first k layers, as LayerSkip): a draft, not a sampling strategy
STRATEGY_NAMES = STRATEGIES + (EARLY_EXIT,)  # what draft_model.strategy and `qd compare-layers` accept
GATES = ("channel", "scalar")  # qdlib.fusion: one tanh gate per hidden channel, or one for all
MEMORY_KINDS = ("static", "live")  # qdlib.memories: a knowledge cache of items, or the teacher's states of the text
OBJECTIVES = ("kl", "tvd")  # qdlib.distill: T^2 KL, or the total-variation distance (one minus the acceptance)
TRAIN_PARAMS = ("all", "fusion", "body")  # qdlib.trainer: which of the draft's parameters learn
FUSION_INITS = ("keep", "similarity")  # qdlib.memory_train: the fusion blocks' start
MIXED_PRECISION = ("auto", "bf16", "no")  # every trainer: bf16 autocast where the device supports it, always, never

"""Training: the generic core trainer (``mblm.train.core``) and MBLM's trainers, configs and
dataset registries (``mblm.train.mblm``); command-line entry points in ``mblm.train.cli``."""

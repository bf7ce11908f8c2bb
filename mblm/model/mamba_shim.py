"""The Mamba classes the original's ``mblm.model.mamba_shim`` exports, all of them at once.

The original exports either mamba_ssm's Mamba2 (``Mamba2Mixer``) or mambapy's Mamba1 (``Mamba1``,
``Mamba1Config``) depending on what is installed, and sets the other names to None. mblm-cpp
implements both natively (``mblm.model.mamba2`` and ``mblm.model.mamba1``), so all three names are
classes on every platform, no optional dependency is imported and no fallback warning is issued.
"""

from mblm.model.mamba1 import Mamba as Mamba1
from mblm.model.mamba1 import MambaConfig as Mamba1Config
from mblm.model.mamba2 import Mamba2Mixer

__all__ = ["Mamba1", "Mamba1Config", "Mamba2Mixer"]

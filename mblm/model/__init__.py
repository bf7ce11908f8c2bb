"""The MBLM model: configs, stage blocks and the hierarchical model itself."""

"""The networks: the ConvNeXt network (V1, V2 and isotropic as block options), its layers, and
the decoders and heads built on its feature pyramid (UperNet).
"""

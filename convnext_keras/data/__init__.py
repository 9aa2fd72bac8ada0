"""Label files and dataset tables that ship with the package: ImageNet names, ADE20K names and
palette.
"""

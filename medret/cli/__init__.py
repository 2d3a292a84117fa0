"""The ``medret`` command line. Command modules import heavy libraries inside ``run``."""

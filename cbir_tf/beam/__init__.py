"""Descriptor extraction as an Apache Beam pipeline (`extract.py --runner=beam`): extract.py."""

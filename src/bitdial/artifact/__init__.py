"""The .bitdial artifact: format (``format.py``), streamed atomic writer, validating mmap reader."""

from bitdial.artifact.format import FORMAT_VERSION, read_header
from bitdial.artifact.reader import Artifact, load_artifact_source, open_artifact, rewrite_tensors, update_metadata
from bitdial.artifact.writer import QuantSettings, match_pattern, resolve_map, write_artifact

__all__ = ["FORMAT_VERSION", "Artifact", "QuantSettings", "load_artifact_source", "match_pattern",
           "open_artifact", "read_header", "resolve_map", "rewrite_tensors", "update_metadata", "write_artifact"]

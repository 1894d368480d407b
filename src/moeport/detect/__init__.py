"""Work out what a checkpoint is: family, layers, experts and storage formats."""

from moeport.codecs.format import ExpertFormat
from moeport.detect.detection import Detection, detect

__all__ = ["Detection", "ExpertFormat", "detect"]

"""Work out what a checkpoint is: family, layers, experts and storage formats."""

from moeport.detect.detection import Detection, detect
from moeport.detect.formats import ExpertFormat

__all__ = ["Detection", "ExpertFormat", "detect"]

"""ltuning: label-, prompt- and prefix-based parameter-efficient fine-tuning with fused shared-prefix attention."""
from .classifier import Classifier
from .methods import METHODS, MethodConfig, make_config
from .model import LTuningModel, patch, unpatch
from .models import load_base
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = ["Classifier", "METHODS", "MethodConfig", "make_config", "LTuningModel", "patch", "unpatch", "load_base", "TrainConfig"]

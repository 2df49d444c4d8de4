"""Reference networks: the DDPM UNet denoiser and CIFAR-10 classifiers for CFD."""

from kdiff.models.classifiers import CLASSIFIERS, ResNet18, SmallCNN, build_classifier
from kdiff.models.unet import UNet, UNetConfig

__all__ = ["CLASSIFIERS", "ResNet18", "SmallCNN", "UNet", "UNetConfig", "build_classifier"]

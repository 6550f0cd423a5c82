"""Data for every model input: image reading (EXIF orientation, bit depth, colour, frames), datasets,
transforms, batching and the device choice; training, evaluation, prediction, calibration and rotation
all read images through here."""

from .datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    ImageFolder,
    ImageList,
    check_same_classes,
    find_classes,
    read_idx,
)
from .device import resolve_device
from .images import IMG_EXTENSIONS, Unreadable, image_mode, list_images, load_image, resize_short, upright
from .loaders import ShardSampler, build_loader, skip_collate
from .transforms import build_transform, eval_transform

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "FashionMNIST", "ImageFolder", "ImageList", "check_same_classes", "find_classes", "read_idx",
           "resolve_device", "IMG_EXTENSIONS", "Unreadable", "image_mode", "list_images", "load_image",
           "resize_short", "upright", "ShardSampler", "build_loader", "skip_collate", "build_transform",
           "eval_transform"]

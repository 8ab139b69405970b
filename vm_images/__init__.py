"""The guest image: a recipe and a builder producing a rootfs (nspawn) and a qcow2 disk
with kernel and initrd (libvirt), cached by the recipe's hash."""

from .builder import Image, Recipe, build_image, find_image, list_images, prune_images, require_image
from .errors import BuildError, ImageError, ImageNotBuilt, RecipeError

__all__ = ["Image", "Recipe", "build_image", "find_image", "list_images", "prune_images", "require_image",
           "ImageError", "BuildError", "ImageNotBuilt", "RecipeError"]

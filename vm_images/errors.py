"""Errors of the image stage. Each says what went wrong and what to do about it."""


class ImageError(Exception):
    """Base class for guest-image problems."""


class RecipeError(ImageError):
    """The recipe file is malformed or names a file that does not exist."""


class BuildError(ImageError):
    """A build step failed; the message names the step and its log."""


class ImageNotBuilt(ImageError):
    """No image for the current recipe is in the cache."""

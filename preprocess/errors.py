"""The one error preprocessing raises: the client sent media it cannot have (HTTP 400)."""


class MediaError(ValueError):
    """Bad or disallowed media: undecodable, too large, outside the allowed sources."""

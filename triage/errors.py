"""Errors a user can act on (printed without a traceback by the stage scripts)."""


class PipelineError(Exception):
    """A problem with inputs or parameters that the user must fix."""


class ParamsError(PipelineError):
    """params.yaml has an unknown key, a missing key or a wrong type/value."""


class DataError(PipelineError):
    """The input data does not follow the expected layout."""


class WeightsError(PipelineError):
    """Model weights are missing, corrupt or for another architecture."""

"""The one exception type users see: a message that names the key, file or id, and the fix."""


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, no network for a hub id).

    The message must say what is wrong, where (config key, file path or model id) and what to do.
    Snakemake prints it as is, so keep it free of stack-trace noise.
    """

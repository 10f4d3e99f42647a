"""The one exception type for mistakes a user can make and fix.

Command-line tools print the message (never a traceback) and exit non-zero; see ``braintumnet.cli``.
"""

from __future__ import annotations

# Exit codes, documented in docs/data.md. 0 = success.
EXIT_USER_ERROR = 2  # bad arguments, missing site folder, unreadable contract files
EXIT_DATA_PROBLEMS = 3  # some cases were quarantined (with --strict: nothing prepared)
EXIT_NOTHING_USABLE = 4  # no case of a site could be used


class BrainTumNetError(Exception):
    """A problem the user can fix. The message names the file (or setting) and the fix."""

    exit_code = EXIT_USER_ERROR


class CaseProblem(BrainTumNetError):
    """One case cannot be used. It is quarantined; the rest of the site goes on.

    Args:
        case_id: the case's id from ``cases.csv``.
        path: the file or folder at fault.
        problem: what is wrong and how to fix it, one line.
    """

    exit_code = EXIT_DATA_PROBLEMS

    def __init__(self, case_id: str, path: str, problem: str):
        self.case_id, self.path, self.problem = case_id, str(path), problem
        super().__init__(f"case {case_id}: {path}: {problem}")

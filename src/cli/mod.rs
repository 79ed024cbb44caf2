//! The command line: argument definitions (shared with the man page and completions
//! generators) and one small module per verb.

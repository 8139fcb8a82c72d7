"""lmforge: the command line above the stages (pipeline), the machinery (infra), the flows and the bench."""

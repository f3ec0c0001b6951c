"""The shipped dataset configs (``<name>.yaml``), package data; hmoe.configs resolves names."""

"""Command line: `moeport inspect`, `moeport demo`."""

"""The demo at the edge: `data` generates its datasets and checks their answers, `command` is `loraplex demo`.
Only the CLI imports it."""

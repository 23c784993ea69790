#!/usr/bin/env bash
# Demo steps of the eval family; filled in with its commands.
set -euo pipefail

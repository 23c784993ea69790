#!/usr/bin/env bash
# Demo steps of the data family; filled in with its commands.
set -euo pipefail

#!/usr/bin/env bash
# Demo steps of the dpo family; filled in with its commands.
set -euo pipefail

#!/usr/bin/env bash
# Demo steps of the rag family; filled in with its commands.
set -euo pipefail

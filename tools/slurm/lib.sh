# Sourced by train.sbatch and task.sh: run a command, or with DRY_RUN=1 print it as one shell line
# (words quoted only where the shell needs it) and run nothing.

glmjax_error() {
  echo "glmjax: error: $*" >&2
  exit 2
}

case "${DRY_RUN:-}" in
  "" | 0 | 1) ;;
  *) glmjax_error "DRY_RUN=$DRY_RUN: 1 prints the commands, empty or 0 runs them" ;;
esac

glmjax_run() {
  if [ "${DRY_RUN:-}" = 1 ]; then
    local word words=()
    for word in "$@"; do
      if [[ $word =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
        words+=("$word")
      else
        words+=("'${word//\'/\'\\\'\'}'")
      fi
    done
    printf '%s\n' "${words[*]}"
  else
    exec "$@"
  fi
}

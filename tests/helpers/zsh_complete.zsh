# zsh -f zsh_complete.zsh FPATH_DIR OUT_FILE WORDS...
#
# What zsh's completion offers after the command line WORDS (a last empty
# word: complete a new word), written to OUT_FILE one match per line.
#
# An interactive zsh runs in a pseudo-terminal (zsh/zpty) with the
# completion system loaded from FPATH_DIR first; compadd is wrapped so that
# every match it is given and that fits what is typed is also appended to
# OUT_FILE. The line is typed with a TAB, and the run ends when the
# completion's post-function prints its marker.
zmodload zsh/zpty || exit 3
dir=$1 out=$2
shift 2
zpty session zsh -f -i
zpty -w session "fpath=(${(q)dir} \$fpath); autoload -U compinit; compinit -u -D"
zpty -w session "compadd() { if (( \${@[(I)-[OAD]]} )); then builtin compadd \"\$@\"; return; fi; local -a m; builtin compadd -O m \"\$@\"; print -rl -- \$m >> ${(q)out}; builtin compadd \"\$@\"; }"
# The marker is written split in two so that the echo of this very line does not match it.
zpty -w session 'mark() { print -r -- "<<""DONE>>"; }; comppostfuncs=(mark); bindkey "^I" complete-word'
zpty -w session "$*"$'\t'
zpty -r session line '*<<DONE>>*'
case $line in
    *"invalid argument"*|*"command not found"*|*"parse error"*|*"_arguments:"*) print -r -- "$line" >&2; zpty -d session; exit 4 ;;
esac
zpty -d session

if [ "$1" -eq 0 ] && command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then
    semodule -r satellite 2>/dev/null || :
fi

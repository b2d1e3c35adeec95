/usr/lib/satellite/package-setup configure
# The policy module, when SELinux is on; then label the tree it covers.
if command -v selinuxenabled >/dev/null 2>&1 && selinuxenabled; then
    semodule -i /usr/share/selinux/packages/satellite.pp || :
    restorecon -R /var/www/satellite /usr/lib/satellite /run/satellite 2>/dev/null || :
fi
# The Apache site (/etc/httpd/conf.d/satellite.conf), only once `httpd -t`
# passes with it; otherwise it says what to fix.
/usr/lib/satellite/package-setup site || :

# $1 is 0 on erase, 1 on upgrade: only an erase stops and unlinks. An erase
# keeps satellite.toml, the database and the routes (rpm has no purge);
# package-setup remove takes the site out of /etc/httpd/conf.d and reloads a
# running httpd gracefully, so no session in the database stays reachable.
if [ "$1" -eq 0 ]; then
    /usr/lib/satellite/package-setup remove
fi

#!/bin/sh
# /usr/bin/satellite from the packages: the admin command of the install
# tree under /var/www/satellite. The program itself lives in
# /usr/lib/satellite/bin beside the endpoints (which `satellite init` and
# `satellite demo` copy from there); from that path it would look for
# /usr/lib/satellite/etc, so the packaged tree's configuration is named
# here. --config and $SATELLITE_CONFIG still win.
if [ -z "$SATELLITE_CONFIG" ]; then
    SATELLITE_CONFIG=/var/www/satellite/etc/satellite.toml
    export SATELLITE_CONFIG
fi
exec /usr/lib/satellite/bin/satellite "$@"

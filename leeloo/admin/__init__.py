"""
The operator's side of the relay: C{leeloo-admin} (L{cli}), the admin API
it talks to on C{--admin-listen} (L{api}), what the relay leaves in its
data directory for it (L{datadir}: its effective configuration, the API's
token and address), and the state read straight from the database and
written as one JSON document (L{state}).
"""

"""
The relay's core, sans I/O, in parts each found by its name.

Nothing here imports a reactor, a transport or Autobahn.  A connection is a
L{sessions.Session} whose L{peer.IPeer} the core sends through; time comes
from an injected clock (anything with C{seconds()} and C{callLater()});
state is written through a L{leeloo.store.Journal} to an
L{leeloo.store.IStore}, the authority: what the parts hold in memory is a
cache of it, and what they do not hold they look up there.  Members are
reached through the fan-out, L{leeloo.fanout.IFanout}, never by walking
another part's dictionaries.  L{leeloo.relay.Relay} puts the parts together
and is what the WebSocket adapter, the web layer and the tests drive.

    - L{peer}: what the core sends through (L{peer.IPeer}) and what it
      sends (L{peer.Outgoing}, encoded once for every peer it goes to);
    - L{sessions}: the connections, the device each is bound to, its
      replacement by a newer connection, and shutdown pacing;
    - L{identity}: device ids and their keys, trust on first use;
    - L{admission}: rate buckets, entry budgets and strikes;
    - L{crews}: crews, their members, and the memberships (session x crew)
      that hold each connection's delivery position in a crew;
    - L{presence}: who hears that a member left, and the grace before;
    - L{delivery}: publishing to a crew's log, C{client_msg_id}, fan-out
      once stored, the log's bound, back-pressure from the store;
    - L{replay}: a returning member's missed messages, held live traffic,
      proofs of receipt and acks;
    - L{handlers}: one method per frame a device sends;
    - L{bot}: the Telegram bot's crews and messages;
    - L{tokens}: Spotify tokens parked for devices that are offline;
    - L{pairing}: Spotify pairings, the relay as the device's broker;
    - L{spotify_broker}: Spotify refresh and search for devices, through
      the relay's app (its secret and app token), with Spotify's limits;
    - L{retention}: what is forgotten, and when;
    - L{operator}: what the relay's operator changes (C{leeloo-admin}).
"""

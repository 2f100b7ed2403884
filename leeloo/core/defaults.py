"""
The relay's defaults.  (The close codes are the protocol's:
L{leeloo.messages.CloseCode}.)
"""

TELEGRAM_DEVICE_ID = "telegram"
# A device back in its crew within this many seconds was never away, as
# far as the crew hears.
PRESENCE_GRACE = 10.0
TOKEN_TTL = 3600.0
DAY = 86400.0
EPHEMERAL_AGE = 600.0
BIND_TIMEOUT = 60.0
MiB = 1024 * 1024
CREW_LOG_BYTES = 16 * MiB
STORE_QUEUE_BYTES = 8 * MiB
# Random codes tried at each length before a longer one; the longest.
CODE_TRIES = 8
MAX_GENERATED_CODE_LENGTH = 16

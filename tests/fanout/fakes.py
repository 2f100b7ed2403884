"""
Stand-ins for the relay parts a cluster fan-out reaches (its replayer, a
crew, a membership, a peer), for tests of leeloo.fanout without a relay.
"""


class Replayer:
    def __init__(self):
        self.caught_up = []

    def catch_up(self, membership):
        self.caught_up.append(membership)


class Relay:
    def __init__(self):
        self.replayer = Replayer()


class Crew:
    def __init__(self, code, fanned_seq):
        self.code = code
        self.fanned_seq = fanned_seq


class Membership:
    def __init__(self, crew, last_sent_seq):
        self.crew = crew
        self.last_sent_seq = last_sent_seq
        self.held = None
        self.session = self


class Peer:
    def __init__(self):
        self.sent = []

    def send(self, out):
        self.sent.append(out.message)

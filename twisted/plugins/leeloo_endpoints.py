"""
The C{letsencrypt:} server endpoint string: HTTPS straight from certbot's
certificates, renewed without a restart.  See L{leeloo.tls}.
"""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class LetsEncryptEndpointParser:
    prefix = "letsencrypt"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from leeloo.tls import endpoint_from_string_args

        return endpoint_from_string_args(reactor, *args, **kwargs)


letsencrypt = LetsEncryptEndpointParser()

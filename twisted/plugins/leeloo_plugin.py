from twisted.application.service import ServiceMaker

leeloo = ServiceMaker("LEELOO relay", "leeloo.tap", "The LEELOO music-sharing relay.", "leeloo")

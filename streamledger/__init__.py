"""streamledger"""

"""NYC COVID-19 model: disease progression, layered transmission, behaviour, policy and economy."""

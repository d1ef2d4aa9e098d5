"""City population builders (census data -> `agenttensor.population.Population`)."""

